"""The page side: what `app.py` needs besides layout and wiring. It uses `captioner`; the library never uses it.

- `api`: the described endpoints (/caption, /explain, /heatmap, /locate), which are also the MCP tools, and the
  models behind them.
- `serving`: how the page runs on Gradio and Spaces (errors as page messages, ZeroGPU, the output-image cache).
- `inputs`: components that validate as the library does, and the map controls read into library arguments.
- `views`: what the page draws for a result, and the library's notes in the page's words.
- `check`: "Can I trust this map?": the selected word's map check, the methods side by side, and /check.
"""
