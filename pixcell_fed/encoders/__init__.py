"""Conditioning and feature encoders by name (``uni2-h``, ``timm:<arch>``, tiny twins) and the cached embedder.

``load_encoder(name, weights_dir, device)`` returns an :class:`~pixcell_fed.encoders.base.Encoder`;
``check_folder(name, weights_dir)`` checks a weight folder without loading it;
``embed_tiles(encoder, items, cache_path)`` embeds a tile stream with an on-disk cache kept in the site's work folder.
Embeddings identify their source tiles: they never leave the site. Importing this package is cheap.
"""

from __future__ import annotations

from pixcell_fed.lazy import lazy_exports

_LAZY = {
    "Encoder": "pixcell_fed.encoders.base",
    "EncoderFolder": "pixcell_fed.encoders.base",
    "ENCODERS": "pixcell_fed.encoders.registry",
    "check_folder": "pixcell_fed.encoders.registry",
    "load_encoder": "pixcell_fed.encoders.registry",
    "encoder_names": "pixcell_fed.encoders.registry",
    "embed_tiles": "pixcell_fed.encoders.cache",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = list(_LAZY)
