# libquant's quant schemes against the real bitsandbytes, compressed-tensors and torch on the CPU:
# byte-identical quantized tensors and dequantized values (libquant_interop.py, driving
# libquant_tool). Label "interop".
add_executable(libquant_tool ${CMAKE_CURRENT_LIST_DIR}/libquant_tool.cpp)
target_link_libraries(libquant_tool PRIVATE libquant formats qtool_warnings)
add_test(NAME interop_libquant_schemes
  COMMAND ${QTOOL_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/libquant_interop.py --tool $<TARGET_FILE:libquant_tool>)
set_tests_properties(interop_libquant_schemes PROPERTIES LABELS interop TIMEOUT 3600)
