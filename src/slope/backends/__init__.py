"""Sparse products behind one door: the reference path, the 2:4 semi-structured backends, their choice and checks."""
