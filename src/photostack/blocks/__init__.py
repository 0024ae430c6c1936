"""Generic building blocks. They know nothing about photos and never import service, cluster or ops."""
