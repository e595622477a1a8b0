"""The demo's and the tests' synthetic world (shapes whose captions are true), its pretraining
shards and downstream sets in the real file formats, and the stand-in for ImageNet weights.
Nothing in the library core imports it."""
