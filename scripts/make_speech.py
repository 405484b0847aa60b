"""Write the deterministic speech-like test signal to a wav file.

    python scripts/make_speech.py out.wav --seconds 4 --sample-rate 16000 --seed 0
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from runtime.media import synth_speech_like, write_wav


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="wav file to write (16-bit PCM, mono)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    samples = synth_speech_like(args.seconds, args.sample_rate, seed=args.seed)
    write_wav(args.out, samples, args.sample_rate)
    print(f"wrote {args.out}: {len(samples) / args.sample_rate:.2f} s at {args.sample_rate} Hz")


if __name__ == "__main__":
    main()
