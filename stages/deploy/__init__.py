"""The deployed graph: `defense` builds a posterior defense from `--defense` flags around a victim (images in
[0, 1] -> normalise -> network -> softmax -> defense), `onnx_export` exports and loads that graph as ONNX,
`watermark_key` holds the watermark defense's secret key file."""
