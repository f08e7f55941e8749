# planner: qtool's balanced plan against accelerate's infer_auto_device_map on the same model.
add_test(NAME interop_plan_vs_accelerate
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/plan_interop.py ${QTOOL_EXE}
                 ${CMAKE_CURRENT_BINARY_DIR}/plan-interop --table ${CMAKE_CURRENT_BINARY_DIR}/plan-interop.md)
set_tests_properties(interop_plan_vs_accelerate PROPERTIES LABELS interop TIMEOUT 900)
