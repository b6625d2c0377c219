"""Data: `raw` finds torchvision's raw files offline or downloads them, `readers` turns every supported source
(torchvision sets, image folders, the offline pools) into a RawDataset, `prepared` writes and reads `dataset/1`
artifacts and batches them, and `near/` generates the near-distribution families."""
