"""Headless use of a real ComfyUI: boot it in process, convert UI workflows to API prompts, run them.

Used by the tests and by `python -m z2i.run`; never imported when ComfyUI loads the pack as custom nodes.
"""
