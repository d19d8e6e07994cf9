"""ImageNet classification: the reference pretraining recipe, its data pipeline, training and validation."""
