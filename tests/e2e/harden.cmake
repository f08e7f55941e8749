# Hostile input through the CLI (issue 9): deep or duplicate-key JSON in every reader, numbers and
# sizes out of range, non-UTF-8 paths, special files, thread failures, wrapping shapes and offsets.
add_test(NAME e2e_harden_cli COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/harden_cli.sh ${QTOOL_EXE})
set_tests_properties(e2e_harden_cli PROPERTIES LABELS e2e TIMEOUT 900)
