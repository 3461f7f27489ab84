"""Scale-out on Ray Serve: N engine replicas behind one ingress, routed by adapter (model multiplexing).

Optional: needs the `ray` extra (`pip install -e '.[ray]'`). `peftserve ray serve --replicas N` runs it;
`server.ray.app:build` is the importable application for `serve run` and Serve config files.
"""
