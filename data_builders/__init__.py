"""Builders that turn raw data into preference datasets."""
