# runner: qtool verify and qtool profile end to end on the CPU backend (every scheme, streamed and
# disk groups, corruption after planning, a mismatched plan).
add_test(NAME e2e_verify_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/verify_cli.sh ${QTOOL_EXE} ${PROJECT_SOURCE_DIR})
set_tests_properties(e2e_verify_cli PROPERTIES LABELS e2e TIMEOUT 900)
