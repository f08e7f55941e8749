# runner: the real forward in qtool verify on the CPU backend (verify_forward.sh). A setup test
# quantizes and plans a tiny Llama and a tiny Flux pipeline once (a fixture); each corrupted tensor
# and each class of bad input is a test of its own.
set(VF_WORK ${CMAKE_CURRENT_BINARY_DIR}/verify_forward_work)
set(VF ${CMAKE_CURRENT_SOURCE_DIR}/verify_forward.sh ${QTOOL_EXE} ${PROJECT_SOURCE_DIR} ${VF_WORK})
add_test(NAME e2e_verify_forward_setup COMMAND bash ${VF} setup)
set_tests_properties(e2e_verify_forward_setup PROPERTIES LABELS e2e TIMEOUT 900 FIXTURES_SETUP verify_forward)

# MODEL:TENSOR (an embedding, norms, a bias, a plain head, a quantized weight, its absmax, the
# absmax's scale (double quant), an fp8 weight's scale).
set(VF_CORRUPT
  llama:model.embed_tokens.weight
  llama:model.layers.0.input_layernorm.weight
  llama:model.norm.weight
  llama:lm_head.weight
  llama:model.layers.1.self_attn.q_proj.weight
  llama:model.layers.1.self_attn.q_proj.weight.absmax
  llama:model.layers.1.self_attn.q_proj.weight.nested_absmax
  flux:transformer/x_embedder.weight
  flux:transformer/transformer_blocks.0.attn.norm_q.weight
  flux:transformer/single_transformer_blocks.1.attn.to_q.bias
  flux:transformer/transformer_blocks.1.ff.net.0.proj.weight
  flux:transformer/transformer_blocks.1.ff.net.0.proj.weight.absmax
  flux-fp8:transformer/transformer_blocks.0.attn.to_k.weight
  flux-fp8:transformer/transformer_blocks.0.attn.to_k.weight_scale)
foreach(c ${VF_CORRUPT})
  string(REPLACE ":" ";" parts ${c})
  list(GET parts 0 model)
  list(GET parts 1 tensor)
  string(REGEX REPLACE "[^A-Za-z0-9_]" "_" id "${model}_${tensor}")
  add_test(NAME e2e_verify_corrupt_${id} COMMAND bash ${VF} corrupt ${model} ${tensor})
  set_tests_properties(e2e_verify_corrupt_${id} PROPERTIES LABELS e2e TIMEOUT 300 FIXTURES_REQUIRED verify_forward)
endforeach()

# MODEL:CASE, see st_edit.py derive.
set(VF_INPUTS llama:missing llama:misnamed llama:shape llama:tokens llama:dtype llama:range
              flux:missing flux:misnamed flux:unprefixed flux:shape flux:tokens flux:dtype
              flux:latents flux:nolatents)
foreach(c ${VF_INPUTS})
  string(REPLACE ":" ";" parts ${c})
  list(GET parts 0 model)
  list(GET parts 1 case)
  add_test(NAME e2e_verify_inputs_${model}_${case} COMMAND bash ${VF} input ${model} ${case})
  set_tests_properties(e2e_verify_inputs_${model}_${case} PROPERTIES LABELS e2e TIMEOUT 300 FIXTURES_REQUIRED verify_forward)
endforeach()

# A small FluxPipeline's final latents on the ids and latents diffusers' FluxPipeline ran
# (tests/runner/data/flux_pipeline_small: the folder and its vectors, from
# tests/interop/pipeline_flux.py --save).
add_test(NAME e2e_verify_pipeline_vectors
         COMMAND bash ${VF} pipeline-vectors ${PROJECT_SOURCE_DIR}/tests/runner/data/flux_pipeline_small)
set_tests_properties(e2e_verify_pipeline_vectors PROPERTIES LABELS e2e TIMEOUT 300 FIXTURES_REQUIRED verify_forward)
# A whole forward at 4096 tokens: 12 s optimised, too slow for the sanitizer build (which runs the
# labels unit and e2e), so it has a label of its own; the default suite runs it.
add_test(NAME e2e_verify_long_sequence COMMAND bash ${VF} long-sequence)
set_tests_properties(e2e_verify_long_sequence PROPERTIES LABELS long TIMEOUT 300 FIXTURES_REQUIRED verify_forward)
add_test(NAME e2e_verify_denoise_usage COMMAND bash ${VF} denoise-usage)
set_tests_properties(e2e_verify_denoise_usage PROPERTIES LABELS e2e TIMEOUT 120 FIXTURES_REQUIRED verify_forward)
add_test(NAME e2e_verify_transformer_folder COMMAND bash ${VF} transformer-folder)
set_tests_properties(e2e_verify_transformer_folder PROPERTIES LABELS e2e TIMEOUT 300 FIXTURES_REQUIRED verify_forward)
# Plans over two GPUs (verify_two_gpus.sh): each unit on its own GPU's ops, the forward's state
# handed between them, the output equal to the one-GPU plan's.
# The Flux transformer's part (flux --scale 0.25: about 10 s optimised, minutes under the
# sanitizers) has the label `long`, which the default suite runs and the sanitizer build does not.
add_test(NAME e2e_verify_two_gpus COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/verify_two_gpus.sh ${QTOOL_EXE} cpu models)
set_tests_properties(e2e_verify_two_gpus PROPERTIES LABELS e2e TIMEOUT 300)
add_test(NAME e2e_verify_two_gpus_flux COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/verify_two_gpus.sh ${QTOOL_EXE} cpu flux)
set_tests_properties(e2e_verify_two_gpus_flux PROPERTIES LABELS long TIMEOUT 300)
add_test(NAME gpu_verify_two_gpus COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/verify_two_gpus.sh ${QTOOL_EXE} cuda)
set_tests_properties(gpu_verify_two_gpus PROPERTIES LABELS gpu TIMEOUT 600 SKIP_RETURN_CODE 77)
