# quantize: transformers + bitsandbytes load qtool's int8 / nf4 output of the tiny Llama on the CPU
# with logits within the schemes' error, and compressed-tensors decompresses qtool's fp8 output to
# exactly what `qtool dequantize` gives (quantize_interop.py). Label "interop".
add_test(NAME interop_quantize_loaders
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/quantize_interop.py
                 --qtool ${QTOOL_EXE} --samples ${PROJECT_SOURCE_DIR}/sample_configs)
set_tests_properties(interop_quantize_loaders PROPERTIES LABELS interop TIMEOUT 1800)
