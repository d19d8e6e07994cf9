"""Reading user images, the dense-prediction preprocessing, and the sample photographs for demos and tests."""
