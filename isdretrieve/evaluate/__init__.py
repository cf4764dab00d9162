"""Evaluation of banks: k-NN classification (the protocols by name, the vote, ``isd-knn`` through an
index) and the linear probes (on bank features, or the ISD protocol on the images)."""
