"""RetinaNet + FPN object detection on the PVT backbone (COCO layout, pycocotools evaluation)."""
