"""The `avatar` CLI: help, the timing report, the demo's streaming loop (against a scripted engine that
follows the Engine contract), once the real engine imports a short end-to-end demo, and user mistakes
through the real `avatar` entry point (a subprocess): one line, exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from runtime import cli
from runtime.config import EngineConfig
from runtime.media import write_wav

runner = CliRunner()


def test_help():
    result = runner.invoke(cli.app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "demo" in result.output


def test_demo_help_lists_options():
    result = runner.invoke(cli.app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--out", "--seconds", "--audio", "--image", "--preset", "--checkpoint", "--device",
                   "--seed", "--chunk-ms"):
        assert option in result.output


# ---- report formatting --------------------------------------------------------------------------

def _report() -> cli.StreamReport:
    return cli.StreamReport(
        blocks=[cli.BlockRecord(0, 9, {"audio": 0.010, "denoise": 0.100, "decode": 0.020, "total": 0.130}),
                cli.BlockRecord(1, 12, {"audio": 0.004, "denoise": 0.090, "decode": 0.030, "total": 0.124}),
                cli.BlockRecord(2, 12, {"denoise": 0.080, "total": 0.200, "extra": 0.001})],
        first_block_latency_s=0.25, wall_s=2.0, audio_s=2.0)


def test_block_table():
    caption, *lines = cli.format_block_table(_report()).splitlines()
    assert caption == cli.TABLE_CAPTION and "not audio length" in caption
    assert lines[0].split() == ["block", "frames", "audio-stage", "ms", "denoise", "ms", "decode", "ms",
                                "extra", "ms", "total", "ms"]
    assert lines[2].split() == ["0", "9", "10.0", "100.0", "20.0", "-", "130.0"]
    assert lines[4].split() == ["2", "12", "-", "80.0", "-", "1.0", "200.0"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_summary():
    text = cli.format_summary(_report(), fps=16)
    assert "frames: 33" in text
    assert "first-block latency: 250.0 ms" in text
    assert "median block time: 130.0 ms" in text
    assert "16.50 FPS" in text and "1.03x real time" in text


# ---- demo against a scripted engine -------------------------------------------------------------

@dataclass
class _Block:
    index: int
    frames: np.ndarray
    first_frame: int
    pts: float
    audio: np.ndarray
    timings: dict = field(default_factory=dict)


class ScriptedEngine:
    """Follows the Engine contract with trivial compute: a block is ready once its audio has arrived."""

    def __init__(self, preset: str = "tiny"):
        self.config = EngineConfig.from_preset(preset)
        self.chunks: list[np.ndarray] = []
        self.reference = None
        self.seed = None

    @property
    def sample_rate(self) -> int:
        return self.config.audio.sample_rate

    @property
    def fps(self) -> int:
        return self.config.fps

    @property
    def size(self) -> tuple[int, int]:
        return self.config.height, self.config.width

    def reset(self, reference_image, prompt_embeds=None, seed=0):
        self.reference, self.seed = reference_image, seed
        self._pending = np.zeros(0, np.float32)
        self._block = 0

    def _ready(self) -> list[_Block]:
        cfg, out = self.config, []
        while True:
            n = cfg.video_frames_in_block(self._block)
            need = n * cfg.samples_per_video_frame
            if len(self._pending) < need:
                return out
            first = cfg.first_video_frame(self._block)
            value = (37 * self._block) % 256
            frames = np.full((n, cfg.height, cfg.width, 3), value, np.uint8)
            out.append(_Block(self._block, frames, first, first / cfg.fps, self._pending[:need].copy(),
                              {"audio": 0.001, "denoise": 0.002, "decode": 0.003, "total": 0.006}))
            self._pending = self._pending[need:]
            self._block += 1

    def step(self, audio_chunk, sample_rate=16000):
        assert sample_rate == self.config.audio.sample_rate
        self.chunks.append(np.array(audio_chunk))
        self._pending = np.concatenate([self._pending, audio_chunk])
        return self._ready()

    def flush(self):
        spf = self.config.samples_per_video_frame
        # Pad to whole video frames and finish the current block (as the real flush does with silence).
        n = self.config.video_frames_in_block(self._block) * spf
        if len(self._pending):
            self._pending = np.concatenate([self._pending, np.zeros(n - len(self._pending), np.float32)])
        return self._ready()


@pytest.fixture
def scripted(monkeypatch):
    made = []

    def create(source, device, dtype, decoder="wan", text_encoder=None, text_device=None, quantize=None):
        made.append((source, device, dtype))
        engine = ScriptedEngine()
        made.append(engine)
        return engine

    monkeypatch.setattr(cli, "_create_engine", create)
    return made


def test_demo_streams_all_audio_and_writes_mp4(tmp_path, scripted):
    out = tmp_path / "demo.mp4"
    result = runner.invoke(cli.app, ["demo", "--out", str(out), "--seconds", "2.0", "--chunk-ms", "40",
                                     "--seed", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    (source, device, dtype), engine = scripted
    assert source == "tiny" and device is None and dtype is None
    assert engine.seed == 3 and engine.reference.shape == (64, 64, 3)
    # Every sample went through step() in 640-sample chunks (40 ms at 16 kHz), in order.
    assert [len(c) for c in engine.chunks[:-1]] == [640] * (len(engine.chunks) - 1)
    from runtime.media import synth_speech_like
    np.testing.assert_array_equal(np.concatenate(engine.chunks), synth_speech_like(2.0, 16000, seed=3))
    # 2 s = 32 frames -> blocks of 9, 12, then the flushed 12: 33 frames.
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        audio = c.streams.audio[0]
        assert abs(float(audio.duration * audio.time_base) - 33 / 16) <= 1 / 16
    assert len(frames) == 33
    assert abs(int(frames[20][0, 0, 0]) - 37) <= 4 and abs(int(frames[30][0, 0, 0]) - 74) <= 4
    # The random-weights warning appears once, before streaming; the table and summary print.
    text = result.output
    assert text.count("RANDOM weights") == 1 and "NOISE" in text
    assert text.index("RANDOM weights") < text.index("engine:")
    assert "block  frames" in text and "first-block latency" in text and "median block time" in text


def _livetalk_layout(root: Path) -> Path:
    """Empty files with the LiveTalk release names (the scripted engine reads none of them)."""
    (root / "LiveTalk-1.3B-V0.1").mkdir(parents=True)
    (root / "LiveTalk-1.3B-V0.1" / "model.safetensors").write_bytes(b"")
    (root / "Wan2.1_VAE.pth").write_bytes(b"")
    (root / "wav2vec2-base-960h").mkdir()
    return root


def test_demo_with_checkpoint_has_no_noise_warning(tmp_path, scripted):
    ckpt = _livetalk_layout(tmp_path / "ckpt")
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--seconds", "1",
                                     "--checkpoint", str(ckpt), "--device", "cpu", "--dtype", "float32",
                                     "--no-progress"])
    assert result.exit_code == 0, result.output
    (source, device, dtype), _ = scripted
    assert source == str(ckpt) and device == "cpu" and dtype == "float32"
    assert "RANDOM weights" not in result.output


def test_demo_uses_given_wav_and_image(tmp_path, scripted):
    from PIL import Image
    wav, img = tmp_path / "in.wav", tmp_path / "ref.png"
    speech = np.sin(np.arange(12000) / 7.0).astype(np.float32) * 0.5
    write_wav(wav, speech, 16000)
    Image.fromarray(np.full((30, 50, 3), 99, np.uint8)).save(img)
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--audio", str(wav),
                                     "--image", str(img)])  # with the progress bar
    assert result.exit_code == 0, result.output
    engine = scripted[1]
    assert engine.reference.shape == (30, 50, 3)  # the engine itself resizes and crops
    np.testing.assert_allclose(np.concatenate(engine.chunks), speech, atol=1 / 32768)


def test_demo_wrong_wav_rate_needs_resample(tmp_path, scripted):
    wav = tmp_path / "r24k.wav"
    write_wav(wav, np.zeros(24000, np.float32) + 0.1, 24000)
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--audio", str(wav),
                                     "--no-progress"])
    assert result.exit_code != 0
    assert "24000 Hz" in result.output and "--resample" in result.output
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--audio", str(wav),
                                     "--resample", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert abs(sum(len(c) for c in scripted[-1].chunks) - 16000) <= 1
    assert f"{wav}: mono 24 kHz -> resampled to 16 kHz" in result.output


def test_demo_says_how_it_converts_stereo_44k(tmp_path, scripted):
    wav = tmp_path / "st.wav"
    import wave
    pcm = (np.random.default_rng(0).uniform(-0.5, 0.5, (44100, 2)) * 32767).astype("<i2")
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(pcm.tobytes())
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--audio", str(wav), "--resample",
                                     "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{wav}: stereo 44.1 kHz -> averaged to mono, resampled to 16 kHz" in result.output
    assert abs(sum(len(c) for c in scripted[-1].chunks) - 16000) <= 1


@pytest.mark.parametrize("args, words", [(["--device", "tpu"], "cpu or cuda"),
                                         (["--dtype", "int8"], "float32"),
                                         (["--chunk-ms", "0"], "chunk-ms")])
def test_demo_bad_options(tmp_path, scripted, args, words):
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--no-progress"] + args)
    assert result.exit_code == 2
    assert words in result.output


# ---- end to end with the real engine ------------------------------------------------------------

def _engine_available() -> bool:
    try:
        from runtime import Engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _engine_available(), reason="engine not available")
def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo.mp4"
    result = runner.invoke(cli.app, ["demo", "--out", str(out), "--seconds", "1.5", "--preset", "tiny",
                                     "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    cfg = EngineConfig.from_preset("tiny")
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert (v.width, v.height) == (cfg.width, cfg.height) and v.average_rate == cfg.fps
        n = len(list(c.decode(video=0)))
        assert abs(float(a.duration * a.time_base) - n / cfg.fps) <= 1 / cfg.fps
    # 1.5 s of audio covers 24 frames; the stream ends on a whole block (9 + 12k frames).
    assert n >= 24 and (n - 9) % 12 == 0
    assert "RANDOM weights" in result.output and "first-block latency" in result.output


@pytest.mark.skipif(not _engine_available(), reason="engine not available")
def test_demo_fp8_micro_and_bad_quantize(tmp_path):
    out = tmp_path / "fp8.mp4"
    result = runner.invoke(cli.app, ["demo", "--out", str(out), "--seconds", "0.6", "--preset", "micro",
                                     "--device", "cpu", "--quantize", "fp8", "--no-progress"])
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as c:
        assert len(list(c.decode(video=0))) > 0
    result = runner.invoke(cli.app, ["demo", "--out", str(out), "--preset", "micro", "--device", "cpu",
                                     "--quantize", "int4", "--no-progress"])
    assert result.exit_code == 2 and "quantize" in result.output


def test_demo_progress_bar_counts_the_flush(tmp_path, scripted):
    result = runner.invoke(cli.app, ["demo", "--out", str(tmp_path / "o.mp4"), "--seconds", "1"])
    assert result.exit_code == 0, result.output
    # 1 s in 40 ms chunks: 25 step() calls + flush() = 26 ticks, ending with every block (9 + 12)
    assert "26/26" in result.output and "blocks=2" in result.output.split("26/26")[-1]


def test_demo_family_liveavatar_writes_an_mp4_of_the_tiny_preset(tmp_path):
    out = tmp_path / "la.mp4"
    result = runner.invoke(cli.app, ["demo", "--family", "liveavatar", "--seconds", "1.2", "--out", str(out),
                                     "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.count("RANDOM weights") == 1 and "wrote" in result.output
    with av.open(str(out)) as c:
        video = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video))
    assert (video.width, video.height) == (64, 64) and frames == 30  # 1.2 s = 30 frames: no audio lost (12, 12, 6)
    bad = runner.invoke(cli.app, ["demo", "--family", "wan", "--out", str(out)])
    assert bad.exit_code != 0 and "family" in bad.output


# ---- user mistakes through the real entry point -------------------------------------------------

# The real entry point costs a process start (torch import, ~3 s idle) per call, so a few cases run it and
# the rest go through the same app in-process (CliRunner: the same click main and the same boundary).
AVATAR = str(Path(sys.executable).with_name("avatar"))


@dataclass
class _Run:
    returncode: int
    stdout: str
    stderr: str = ""


def _avatar(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400", "NO_COLOR": "1"}  # no wrapped or coloured error boxes
    return subprocess.run([AVATAR, *args], check=False, capture_output=True, text=True, timeout=timeout, env=env)


def _in_process(*args: str) -> _Run:
    result = runner.invoke(cli.app, list(args), env={"COLUMNS": "400", "NO_COLOR": "1"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return _Run(result.exit_code, result.output)


def _one_line_user_error(proc, *words: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for w in words:
        assert w in text, text
    return text


def test_cli_truncated_dit_file_is_named(tmp_path):
    from runtime.checkpoint import save_state_dict

    root = _livetalk_layout(tmp_path / "rel")
    dit = root / "LiveTalk-1.3B-V0.1" / "model.safetensors"
    save_state_dict({"w": __import__("torch").zeros(1000)}, dit)
    dit.write_bytes(dit.read_bytes()[:100])
    proc = _avatar("demo", "--checkpoint", str(root), "--out", str(tmp_path / "o.mp4"), "--device", "cpu")
    text = _one_line_user_error(proc, f"error: {dit}: not a readable safetensors file")
    assert "RANDOM" not in text
    # --debug lets the exception through (in-process here: CliRunner keeps it instead of a traceback)
    debug = runner.invoke(cli.app, ["--debug", "demo", "--checkpoint", str(root), "--out", str(tmp_path / "o.mp4"),
                                    "--device", "cpu"])
    assert type(debug.exception).__name__ == "CheckpointError" and str(dit) in str(debug.exception)


@pytest.mark.parametrize("family, layout", [("livetalk", "LiveTalk-1.3B-V0.1/model.safetensors"),
                                            ("liveavatar", "liveavatar.safetensors")])
def test_cli_empty_checkpoint_dir_lists_the_layout(tmp_path, family, layout):
    (tmp_path / "empty").mkdir()
    proc = _in_process("demo", "--family", family, "--checkpoint", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "o.mp4"))
    _one_line_user_error(proc, "not a", "release directory", layout, "wav2vec2")


def test_cli_unknown_preset_before_any_random_weights_note(tmp_path):
    text = _one_line_user_error(_in_process("demo", "--preset", "huge", "--out", str(tmp_path / "o.mp4")),
                                "unknown livetalk preset 'huge'", "tiny")
    assert "RANDOM" not in text


def test_cli_bad_media_files_are_named(tmp_path):
    junk, empty = tmp_path / "face.png", tmp_path / "silence.wav"
    junk.write_text("not an image")
    write_wav(empty, np.zeros(0, np.float32), 16000)
    _one_line_user_error(_in_process("demo", "--image", str(junk), "--out", str(tmp_path / "o.mp4")),
                         f"error: {junk}: not an image file")
    _one_line_user_error(_in_process("demo", "--audio", str(empty), "--out", str(tmp_path / "o.mp4")),
                         f"error: {empty}: holds no audio samples")


@pytest.mark.parametrize("out, words", [("missing/o.mp4", "does not exist"), ("o.avi", "ending in .mp4"),
                                        ("d.mp4", "is a directory")])
def test_cli_outputs_are_checked_before_any_work(tmp_path, out, words):
    (tmp_path / "d.mp4").mkdir()
    run = _avatar if out.startswith("missing") else _in_process
    text = _one_line_user_error(run("demo", "--out", str(tmp_path / out)), "--out", words)
    assert "engine:" not in text and "RANDOM" not in text  # no model was built


def test_cli_liveavatar_checkpoint_loads_the_release(tmp_path):
    """--family liveavatar --checkpoint DIR loads DIR: a damaged LoRA in it is named, and once repaired the
    demo streams with no random-weights note."""
    import torch
    from safetensors.torch import save_file

    from runtime.families.liveavatar.audio_front import tiny_wav2vec2
    from runtime.families.liveavatar.presets import engine_preset
    from runtime.models.vae import WanVAE
    from tests.test_liveavatar_loading import TINY, _lora_state, _tiny_state, _write_trunk

    root = tmp_path / "release"
    trunk = root / "Wan2.2-S2V-14B"
    trunk.mkdir(parents=True)
    state = _tiny_state()
    _write_trunk(trunk, state)
    torch.save(WanVAE(engine_preset("tiny").vae).state_dict(), trunk / "Wan2.1_VAE.pth")
    w2v = root / "wav2vec2-large-xlsr-53-english"
    tiny_wav2vec2(TINY.audio_layers, TINY.audio_dim, seed=4).save_pretrained(w2v)
    (w2v / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True}))
    lora = root / "liveavatar.safetensors"
    lora.write_bytes(b"\x00" * 16)
    args = ["demo", "--family", "liveavatar", "--checkpoint", str(root), "--preset", "tiny", "--device", "cpu",
            "--seconds", "0.2", "--out", str(tmp_path / "la.mp4"), "--no-progress"]
    _one_line_user_error(_in_process(*args), f"{lora}: not a readable safetensors file")
    save_file(_lora_state(state), str(lora))
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "RANDOM" not in result.output and "wrote" in result.output
    with av.open(str(tmp_path / "la.mp4")) as c:
        # 0.2 s of audio gives 0.2 s of video at 25 fps: flush() trims block 0 to the audio (no frame added)
        assert sum(1 for _ in c.decode(video=0)) == 5


def test_bench_table_explains_its_columns():
    from benchmarks import cli as bench_cli

    result = {"kind": "e2e", "path": "engine", "p50_block_ms": 200.0, "p99_block_ms": 250.0, "fps": 60.0,
              "first_frame_ms": 300.0, "peak_memory_mb": 1000.0, "achieved_tflops": 400.0,
              "fraction_of_floor": 0.5, "timer": "cuda events"}
    report = {"environment": {"gpu_name": "H200", "gpu_driver": "1", "cpu": "x", "cpu_threads": 2,
                              "torch_version": "t", "triton_version": "t", "commit": "c"},
              "settings": {"preset": "livetalk-1.3b", "resolution": "512x512", "dtype": "bfloat16",
                           "backend": "auto", "peak_tflops": 790.0,
                           "window": {"block_frames": 3, "sink_frames": 9, "window_frames": 15,
                                      "window_tokens": 15360}},
              "results": {"e2e": result}}
    text = bench_cli.format_table(report)
    assert "% floor" in text.splitlines()[3] and text.splitlines()[4].split()[-1] == "50"
    legend = text.splitlines()[-1]
    assert "% floor: TFLOP/s as a percentage of 790 TFLOP/s" in legend and "docs/performance-floor.md" in legend
    assert all(c.split()[0] in legend for c in bench_cli.COLUMNS)
