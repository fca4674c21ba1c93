"""The D3PO Studio engine: everything the Gradio app, the ComfyUI nodes and the
benchmarks call. Front ends import from here and hold no algorithm code."""
