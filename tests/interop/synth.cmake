# synth: the synthetic presets against transformers and diffusers (label "interop"): the tiny
# presets load with the libraries' classes and run; full-scale names and shapes equal the
# reference definitions built on the meta device. The diffusers part skips (77) without diffusers.
foreach(part transformers diffusers)
  add_test(NAME interop_synth_${part}
           COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                   ${QTOOL_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/synth_interop.py ${part} ${QTOOL_EXE}
                   ${CMAKE_CURRENT_BINARY_DIR}/synth-interop-${part})
  set_tests_properties(interop_synth_${part} PROPERTIES LABELS interop SKIP_RETURN_CODE 77)
endforeach()
