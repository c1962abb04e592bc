"""nerfstudio plugin (issue 23): the studio's text-to-3D methods as ``ns-train`` methods.

``method_configs`` (the entry point) and ``pipeline`` need nerfstudio, installed in its own environment
(docs/notes/issue23.md); ``export`` (checkpoint -> standard 3DGS PLY) needs torch only. Nothing is imported here.
"""
