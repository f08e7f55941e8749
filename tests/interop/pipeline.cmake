# pipeline: `qtool synth --preset tiny-flux` loaded by diffusers' FluxPipeline and run for 2
# denoising steps (output_type="latent") on token ids and latents from a printed seed, bf16 and
# float32; qtool verify's FluxPipeline run (--denoise-steps 2 --inputs) on the same ids and latents
# must lie within twice diffusers' own bf16 noise (pipeline_flux.py). Label "interop".
add_test(NAME interop_pipeline_flux
         COMMAND ${CMAKE_COMMAND} -E env PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1
                 ${QTOOL_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/pipeline_flux.py
                 --qtool ${QTOOL_EXE} --out ${CMAKE_CURRENT_BINARY_DIR}/pipeline_flux --steps 2)
set_tests_properties(interop_pipeline_flux PROPERTIES LABELS interop TIMEOUT 900)
