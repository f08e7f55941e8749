# quantize / dequantize end to end: every sample config on the tiny presets, every user error,
# and kill -9 in the middle of a run.
add_test(NAME e2e_quantize_samples
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/quantize_samples.sh ${QTOOL_EXE} ${PROJECT_SOURCE_DIR}/sample_configs)
add_test(NAME e2e_quantize_errors COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/quantize_errors.sh ${QTOOL_EXE})
add_test(NAME e2e_quantize_kill COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/quantize_kill.sh ${QTOOL_EXE})
set_tests_properties(e2e_quantize_samples e2e_quantize_errors e2e_quantize_kill PROPERTIES LABELS e2e TIMEOUT 600)
# kill -9 at random moments of --force runs of synth and quantize over an existing output.
add_test(NAME e2e_force_kill COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/force_kill.sh ${QTOOL_EXE})
set_tests_properties(e2e_force_kill PROPERTIES LABELS e2e TIMEOUT 600)
