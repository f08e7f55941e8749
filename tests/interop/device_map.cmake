# planner: every component of the presets loads with transformers' / diffusers' from_pretrained and
# the plan's device_map (GPU indices as "cpu", "cpu" as "disk"), with outputs equal to a plain load.
add_test(NAME interop_plan_device_map_loads
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_SOURCE_DIR}/device_map_interop.py ${QTOOL_EXE}
                 ${CMAKE_CURRENT_BINARY_DIR}/device-map-interop)
set_tests_properties(interop_plan_device_map_loads PROPERTIES LABELS interop TIMEOUT 1200)
