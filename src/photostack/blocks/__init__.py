"""Generic building blocks: nothing about photos; never import service, cluster or ops."""
