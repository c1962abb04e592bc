"""The studio's Gradio app: ``python app.py [--host 127.0.0.1] [--port 7860] [--out outputs/app] [--models-dir models]``.

Same as ``studio app``; the UI lives in ``studio/app/``.
"""
import sys

from studio.cli import main

if __name__ == "__main__":
    main(["app", *sys.argv[1:]])
