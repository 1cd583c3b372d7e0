"""Token mixers that replace the N×N attention map: lambda layers, efficient additive
attention (SwiftFormer) and cross-covariance attention (XCiT)."""
