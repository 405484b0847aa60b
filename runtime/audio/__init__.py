"""Audio front end: input checks, the wav2vec2 encoder, and the streaming window over a ring buffer."""
from runtime.audio.encoder import AudioEncoder
from runtime.audio.stream import AudioBufferFull, AudioStream
from runtime.audio.validate import AudioInputError, Resampler, check_chunk, resample

__all__ = [
           "AudioBufferFull",
           "AudioEncoder",
           "AudioInputError",
           "AudioStream",
           "Resampler",
           "check_chunk",
           "resample",
]
