"""The serving layer: ``innsteer serve``, an OpenAI-compatible HTTP server (FastAPI + uvicorn) whose
requests each choose their own steering (``steers``: the named steers and a request's setting;
``slots``: the llama.cpp contexts and their bounded queue; ``app``: the routes). Needs
llama-cpp-python, fastapi and uvicorn (``pip install 'innsteer[llama,serve]'``)."""
