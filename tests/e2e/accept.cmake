# Bad input that must be refused rather than accepted (issue 9): damaged headers, quant state and
# names, symbolic links, configs that quantize nothing; hand-edited plans that disagree with
# themselves or the checkpoint; tensors verify --reference must find changed.
foreach(t inputs plan reference)
  add_test(NAME e2e_accept_${t}
           COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/accept_${t}.sh ${QTOOL_EXE} ${PROJECT_SOURCE_DIR})
  set_tests_properties(e2e_accept_${t} PROPERTIES LABELS e2e TIMEOUT 600)
endforeach()
