"""Weak-label segmentation datasets: the synthetic default, PASCAL VOC 2012 and CamVid."""
