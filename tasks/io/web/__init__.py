"""URL sources: the network (SSRF) policy, the egress proxy every connection goes through, downloads."""
