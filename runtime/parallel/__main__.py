"""`torchrun --nproc-per-node N -m runtime.parallel --model tiny --out out.mp4`: LiveTalk's pipeline,
one process per rank (runtime/families/livetalk/pipeline.py)."""
from runtime.families.livetalk.pipeline import main

main()
