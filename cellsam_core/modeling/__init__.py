"""Model building blocks (torch modules) of CellSAM: CellFinder (AnchorDETR) and the composed model."""
