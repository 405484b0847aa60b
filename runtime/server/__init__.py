"""`avatar serve`: many sessions of one engine over WebSocket (fragmented MP4) and WebRTC (app.py)."""
