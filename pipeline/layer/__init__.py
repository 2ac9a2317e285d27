"""Layer tars: header blocks, the overlay whiteout rules, the walk of a layer_dir, the layer writer and scan, entry
indexes and the delta layers written from them, and tar-split reassembly."""
