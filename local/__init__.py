"""The embedded defaults for laptops and CI: a local S3 server (SeaweedFS), a local
multi-node Ray cluster, and the `resflow up` stack. Imports the library (pipeline/);
the library never imports this package.
"""
