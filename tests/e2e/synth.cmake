# synth: qtool synth end to end (tiny and tiny-flux written and inspected, determinism across
# --threads, refusal without --force, usage errors, --dry-run) and an interrupted run.
add_test(NAME e2e_synth_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/synth_cli.sh ${QTOOL_EXE})
add_test(NAME e2e_synth_kill COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/synth_kill.sh ${QTOOL_EXE})
set_tests_properties(e2e_synth_cli e2e_synth_kill PROPERTIES LABELS e2e)
