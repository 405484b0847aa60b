"""Adapters from `runtime.realtime.AvatarSession` to the real-time clients integrators use.

Each module imports its client lazily at use, so `import runtime.integrations.X` never needs it:
- `livekit`: a VideoGenerator for livekit-agents' AvatarRunner, in-process start, remote avatar worker;
- `pipecat`: a FrameProcessor (TTS audio in, image + audio frames out);
- `webrtc`: aiortc audio/video tracks (20 ms audio frames, 90 kHz video clock);
- `ray_serve`: a Ray Serve deployment, one engine per replica, sessions pinned to their replica.
"""
