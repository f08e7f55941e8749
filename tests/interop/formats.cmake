# formats: safetensors interop both ways with the reference Python packages (label "interop").
set(QTOOL_FORMATS_INTEROP_WORK ${CMAKE_CURRENT_BINARY_DIR}/formats-interop)
add_test(NAME interop_formats_qtool_to_python
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/formats_interop.py qtool-to-python
                 $<TARGET_FILE:formats_write_sample> ${QTOOL_FORMATS_INTEROP_WORK}/to-python)
add_test(NAME interop_formats_python_to_qtool
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/formats_interop.py python-to-qtool
                 $<TARGET_FILE:formats_dump> ${QTOOL_EXE} ${QTOOL_FORMATS_INTEROP_WORK}/from-python)
set_tests_properties(interop_formats_qtool_to_python interop_formats_python_to_qtool PROPERTIES LABELS interop)
