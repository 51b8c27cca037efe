"""A naive in-place IAM key rotation, as a Baton ``command`` provider: the benchmark's baseline for aws-iam.

``create`` deletes every access key of the user, then creates one: what a
script does when the user has no free place for a second key. The old key
stops working at once, before any consumer has the new one. ``apply``,
``test``, ``retire`` have nothing left to do; ``sessions`` cannot tell. The
admin key comes from AWS_SHARED_CREDENTIALS_FILE (a path in the config, never
the key itself); MOTO_URL and IAM_USER name the endpoint and the user.
"""

from __future__ import annotations

import json
import os
import sys

import boto3


def main() -> int:
    step = sys.argv[-1]
    json.load(sys.stdin)
    if step != "create":
        print(json.dumps({"sessions": []} if step == "sessions" else {}))
        return 0
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=os.environ["MOTO_URL"])
    user = os.environ["IAM_USER"]
    for key in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]:
        iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
    made = iam.create_access_key(UserName=user)["AccessKey"]
    print(json.dumps({"payload": {"access_key_id": made["AccessKeyId"], "secret_access_key": made["SecretAccessKey"]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
