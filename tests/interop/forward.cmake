# forward: tiny random LlamaForCausalLM (GQA, llama3 RoPE, tied and untied, biases) and
# FluxTransformer2DModel built, saved and run in bf16 by transformers / diffusers on the CPU
# (forward_models.py), then qtool's forward on the same files and inputs (forward_compare) within
# the stated tolerance; the same after `qtool quantize` to nf4, int8 and fp8_e4m3, against the
# framework on `qtool dequantize`'s output. Label "interop".
add_test(NAME interop_forward_models
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/forward_models.py
                 --out ${CMAKE_CURRENT_BINARY_DIR}/forward_models --set interop
                 --compare $<TARGET_FILE:forward_compare> --qtool ${QTOOL_EXE})
set_tests_properties(interop_forward_models PROPERTIES LABELS interop TIMEOUT 1200)

# forward_encoders: tiny random T5EncoderModel (gated-gelu and relu, bf16 and fp16, T >= 100, a
# padding mask) and CLIPTextModel (eos_token_id 2 and vocab - 1, EOS-padded ids, a padding mask)
# run by transformers (forward_encoders.py), plus the encoders of `qtool synth --preset
# tiny-flux`; qtool's forward on the same files within the stated tolerance, for
# last_hidden_state and pooler_output. Label "interop".
add_test(NAME interop_forward_encoders
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/forward_encoders.py
                 --out ${CMAKE_CURRENT_BINARY_DIR}/forward_encoders --set interop
                 --compare $<TARGET_FILE:forward_compare> --synth ${QTOOL_EXE})
set_tests_properties(interop_forward_encoders PROPERTIES LABELS interop TIMEOUT 1200)
