#!/usr/bin/env bash
# The runs behind RESULTS.md's corrections tables: every correction fitted from one fit per backbone,
# then scored on ECSSD (TokenCut, CorLoc), CamVid (kNN segmentation under both protocols, the linear
# probe) and imagenet-sample (artifacts, warp consistency); a second fit per backbone with every
# block through the final norm for the depth table.
# Run from the repository root; `runs/` is git-ignored, `results/` holds the JSON the tables read.
#   bash scripts/variant_runs.sh imgfocus|mae|clip
set -euo pipefail
ECSSD=../shared/data/ecssd
CAMVID=../shared/data/camvid
IMAGENET=../shared/data/imagenet-sample
mkdir -p runs results
case "${1:?imgfocus, mae or clip}" in
imgfocus)
    # the corrections that map the output share one pass; test-time registers edit the forward pass
    # (a pass of their own), so on this CPU their TokenCut run takes the first 200 images
    MAPS=soap,posmean,blank,zero-subspace,top-pc,position-pc,high-norm
    [ -f runs/imgfocus-all.safetensors ] || soapvit fit --model zoo:dinov2-s14-imgfocus --images $IMAGENET \
        --synthetic 1000 --blocks all --methods all --out runs/imgfocus-all.safetensors
    soapvit inspect runs/imgfocus-all.safetensors --json > results/fit-imgfocus-residual.json
    soapvit fit --model zoo:dinov2-s14-imgfocus --images $IMAGENET --synthetic 1000 --blocks all --methods all \
        --final-norm all --out runs/imgfocus-finalnorm.safetensors
    soapvit inspect runs/imgfocus-finalnorm.safetensors --json > results/fit-imgfocus-finalnorm.json
    soapvit eval tokencut --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors --variants $MAPS \
        --images $ECSSD/images --masks $ECSSD/masks --out results/tokencut-imgfocus.json
    soapvit eval tokencut --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors \
        --variants soap,registers --limit 200 --images $ECSSD/images --masks $ECSSD/masks \
        --out results/tokencut-imgfocus-registers.json
    soapvit eval knnseg --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors --variants $MAPS \
        --train $CAMVID/train --val $CAMVID/test --max-bank 20000 --out results/knnseg-imgfocus.json
    soapvit eval knnseg --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors \
        --variants soap,registers --train $CAMVID/train --val $CAMVID/test --max-bank 20000 \
        --out results/knnseg-imgfocus-registers.json
    # CAPI's kNN protocol and the linear probe: few enough images for registers' own pass in the same run
    soapvit eval knnseg --protocol capi --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors \
        --train $CAMVID/train --val $CAMVID/test --out results/knnseg-capi-imgfocus.json
    soapvit eval linseg --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors \
        --train $CAMVID/train --val $CAMVID/test --out results/linseg-imgfocus.json
    soapvit eval artifacts --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors \
        --images $IMAGENET --limit 200 --out results/artifacts-imgfocus.json
    soapvit eval warp --model zoo:dinov2-s14-imgfocus --head runs/imgfocus-all.safetensors \
        --images $IMAGENET --limit 200 --out results/warp-imgfocus.json
    ;;
mae)
    soapvit fit --model zoo:mae --images $IMAGENET --blocks all --methods all --out runs/mae-all.safetensors
    soapvit inspect runs/mae-all.safetensors --json > results/fit-mae-residual.json
    soapvit fit --model zoo:mae --images $IMAGENET --blocks all --methods all --final-norm all \
        --out runs/mae-finalnorm.safetensors
    soapvit inspect runs/mae-finalnorm.safetensors --json > results/fit-mae-finalnorm.json
    soapvit eval tokencut --model zoo:mae --head runs/mae-all.safetensors --images $ECSSD/images \
        --masks $ECSSD/masks --image-size 64 --out results/tokencut-mae.json
    soapvit eval artifacts --model zoo:mae --head runs/mae-all.safetensors --images $IMAGENET --limit 200 \
        --out results/artifacts-mae.json
    soapvit eval warp --model zoo:mae --head runs/mae-all.safetensors --images $IMAGENET --limit 200 \
        --out results/warp-mae.json
    soapvit eval knnseg --model zoo:mae --head runs/mae-all.safetensors --train $CAMVID/train \
        --val $CAMVID/test --out results/knnseg-mae.json
    # the zoo's own 64 px instead of CAPI's 224 (a patch-8 model at 224 px is far from its training)
    soapvit eval knnseg --protocol capi --model zoo:mae --head runs/mae-all.safetensors --image-size 64 \
        --train $CAMVID/train --val $CAMVID/test --out results/knnseg-capi-mae.json
    soapvit eval linseg --model zoo:mae --head runs/mae-all.safetensors --train $CAMVID/train --val $CAMVID/test \
        --out results/linseg-mae.json
    ;;
clip)
    # the map corrections only: test-time registers were not calibrated for CLIP (CPU time)
    MAPS=soap,posmean,blank,zero-subspace,top-pc,position-pc,high-norm
    soapvit fit --model zoo:clip-b16 --images $IMAGENET --limit 300 --synthetic 300 --blocks all --methods $MAPS \
        --out runs/clip-all.safetensors
    soapvit inspect runs/clip-all.safetensors --json > results/fit-clip-residual.json
    soapvit fit --model zoo:clip-b16 --images $IMAGENET --limit 300 --synthetic 300 --blocks all --methods $MAPS \
        --final-norm all --out runs/clip-finalnorm.safetensors
    soapvit inspect runs/clip-finalnorm.safetensors --json > results/fit-clip-finalnorm.json
    soapvit eval tokencut --model zoo:clip-b16 --head runs/clip-all.safetensors --variants $MAPS \
        --images $ECSSD/images --masks $ECSSD/masks --limit 200 --out results/tokencut-clip.json
    soapvit eval knnseg --model zoo:clip-b16 --head runs/clip-all.safetensors --variants $MAPS \
        --train $CAMVID/train --val $CAMVID/test --max-bank 20000 --out results/knnseg-clip.json
    soapvit eval knnseg --protocol capi --model zoo:clip-b16 --head runs/clip-all.safetensors \
        --train $CAMVID/train --val $CAMVID/test --out results/knnseg-capi-clip.json
    soapvit eval linseg --model zoo:clip-b16 --head runs/clip-all.safetensors \
        --train $CAMVID/train --val $CAMVID/test --out results/linseg-clip.json
    soapvit eval artifacts --model zoo:clip-b16 --head runs/clip-all.safetensors --images $IMAGENET --limit 200 \
        --out results/artifacts-clip.json
    soapvit eval warp --model zoo:clip-b16 --head runs/clip-all.safetensors --images $IMAGENET --limit 200 \
        --out results/warp-clip.json
    ;;
esac
