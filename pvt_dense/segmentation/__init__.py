"""Semantic FPN on the PVT backbone: ADE20K data, model, loss, training, evaluation and inference."""
