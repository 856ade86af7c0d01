"""Pretext methods, one file each (config, modules, loss, read top to bottom), all satisfying the
`Method` contract of protocol.py. The table of them is ssl_vit.registry."""
