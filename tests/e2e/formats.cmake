# formats: qtool inspect end to end (valid checkpoints, every malformed case, headers only) and the
# CLI's --help/--version.
add_test(NAME e2e_formats_inspect COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/formats_inspect.sh ${QTOOL_EXE})
add_test(NAME e2e_formats_inspect_malformed
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/formats_inspect_malformed.sh ${QTOOL_EXE})
add_test(NAME e2e_formats_inspect_headers_only
         COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/formats_inspect_headers_only.sh ${QTOOL_EXE})
set_tests_properties(e2e_formats_inspect e2e_formats_inspect_malformed e2e_formats_inspect_headers_only
                     PROPERTIES LABELS e2e)
set_tests_properties(e2e_formats_inspect_headers_only PROPERTIES SKIP_RETURN_CODE 77)
