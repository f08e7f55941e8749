# The CPU backend's ops against torch on the CPU (ops_interop.py driving ops_tool): bit mismatch
# counts per op, bounded per op. Label "interop".
add_executable(ops_tool ${CMAKE_CURRENT_LIST_DIR}/ops_tool.cpp)
target_link_libraries(ops_tool PRIVATE runner formats qtool_warnings)
add_test(NAME interop_cpu_ops
  COMMAND ${QTOOL_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/ops_interop.py --tool $<TARGET_FILE:ops_tool>)
set_tests_properties(interop_cpu_ops PROPERTIES LABELS interop TIMEOUT 600)
