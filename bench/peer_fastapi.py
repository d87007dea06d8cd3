"""The peer most users write first: FastAPI + open_clip in one process (used by bench/peers.py).

    python bench/peer_fastapi.py --model ViT-B-32 --port 9100 [--threads 2]

``POST /embed`` with ``{"texts": [...]}`` or ``{"images": [base64 JPEG, ...]}`` answers
``{"embeddings": [[...], ...]}`` (L2-normalised, float32 values as JSON numbers). open_clip's own
transform and tokenizer, ``torch.no_grad``, fp32, random weights seeded as clip-triton's export
(``--seed``). The handlers are plain ``def`` (FastAPI runs them in its thread pool), as the tutorials
write them: concurrent requests each run their own forward. (No ``from __future__ import
annotations`` here: FastAPI must resolve the body model defined inside ``build_app``.)
"""

import argparse
import base64
import io


def build_app(model_name: str, seed: int, threads: int):
    import open_clip
    import torch
    from fastapi import FastAPI, HTTPException
    from PIL import Image
    from pydantic import BaseModel

    from clip_triton.export.adapter import register_model_config  # a model-config JSON path, as clip-triton takes

    model_name = register_model_config(model_name)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    app = FastAPI()

    class Body(BaseModel):
        texts: list[str] | None = None
        images: list[str] | None = None

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/embed")
    def embed(body: Body) -> dict:
        with torch.no_grad():
            if body.texts:
                features = model.encode_text(tokenizer(body.texts))
            elif body.images:
                try:
                    pixels = torch.stack(
                        [preprocess(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in body.images]
                    )
                except Exception as exc:  # noqa: BLE001 (a bad image is the client's error)
                    raise HTTPException(400, f"bad image: {exc}") from None
                features = model.encode_image(pixels)
            else:
                raise HTTPException(400, "send texts or images")
            features = torch.nn.functional.normalize(features, dim=-1)
        return {"embeddings": features.tolist()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()

    import uvicorn

    uvicorn.run(build_app(args.model, args.seed, args.threads), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
