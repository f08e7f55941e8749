# planner: qtool plan end to end on synthetic and quantized checkpoints.
add_test(NAME e2e_plan_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/plan_cli.sh ${QTOOL_EXE} ${PROJECT_SOURCE_DIR})
set_tests_properties(e2e_plan_cli PROPERTIES LABELS e2e TIMEOUT 600)
add_test(NAME e2e_plan_phases COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/plan_phases.sh ${QTOOL_EXE} ${PROJECT_SOURCE_DIR})
set_tests_properties(e2e_plan_phases PROPERTIES LABELS e2e TIMEOUT 600)
