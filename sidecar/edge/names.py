"""The API's names, read from the generated descriptors: what the service, the server and
the token check (``auth``) agree on, without one of them importing another."""

from sidecar.api.v1 import cache_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Cache"].full_name
