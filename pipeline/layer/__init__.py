"""Layer tars: header blocks, the overlay whiteout rules, the layer writer and scan, and tar-split reassembly."""
