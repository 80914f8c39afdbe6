"""The separation engine: Demucs models loaded once per process (`models`), run segment by segment in
batches and streamed through files (`overlap_add`), with fused attention (`attention`); `model_repo`
writes local model repositories (random-weight HTDemucs for tests and offline demos).
"""
